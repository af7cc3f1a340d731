"""The causal trace averaged over facts the model knows (ROME, Figure 2), and the layers it
suggests editing: the peak of the MLP curve at the last subject token, the range around it,
and how firmly a bootstrap over the facts picks that peak."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from edit import arch as arch_table
from edit import lm
from edit.errors import EditError
from edit.facts import Fact
from edit.methods.locate.inputs import (
    KINDS,
    NOISE_MULTIPLIER,
    WINDOW,
    check_settings,
    noise_level,
    parse_kinds,
    subject_range,
)
from edit.methods.locate.single import FactTrace, trace_fact

AVERAGE_SAMPLES = 2  # noise samples per fact when averaging over many facts
# ROME's token categories (Figure 2). ``trace_average`` runs the two that locate a fact:
# the last subject token (where the MLPs matter) and the last token (attention).
CATEGORIES = (
    "first subject",
    "middle subject",
    "last subject",
    "first after",
    "further",
    "last",
)
AVERAGE_CATEGORIES = ("last subject", "last")
RANGE_FRACTION = 0.8  # the suggested layer range: layers within 80% of the peak effect


def category_positions(first: int, stop: int, length: int) -> dict[str, list[int]]:
    """ROME's token categories for a subject at [first, stop) in a prompt of ``length``."""
    return {
        "first subject": [first],
        "middle subject": list(range(first + 1, stop - 1)),
        "last subject": [stop - 1],
        "first after": [stop] if stop < length - 1 else [],
        "further": list(range(stop + 1, length - 1)),
        "last": [length - 1],
    }


@dataclass
class AverageTrace:
    """Indirect effects averaged over facts the model answers correctly (ROME, Figure 2).

    ``effects[kind][l][c]``: mean effect of restoring ``kind`` at layer l at the tokens of
    category ``categories[c]`` (per fact first averaged over the category's tokens).
    """

    model: str
    model_hash: str | None
    data: str
    n_facts: int
    n_checked: int
    kinds: list[str]
    categories: list[str]
    effects: dict[str, list[list[float]]]
    counts: dict[str, int]
    p_clean: float
    p_corrupted: float
    noise: float
    noise_reference: str
    noise_multiplier: float
    samples: int
    window: int
    seed: int
    seconds: float
    peak_layer: int | None = None
    layer_range: list[int] | None = None  # [first, last], inclusive
    range_fraction: float = RANGE_FRACTION
    peak_shares: dict[str, float] | None = None  # layer -> share of bootstrap peaks
    facts: list[dict] = field(default_factory=list)  # per fact: probabilities and effects

    def curve(self, kind: str, category: str = "last subject") -> list[float]:
        c = self.categories.index(category)
        return [row[c] for row in self.effects[kind]]

    def summary(self) -> list[str]:
        lines = [
            f"facts: {self.n_facts} answered correctly (first token) of {self.n_checked} "
            f"checked from {self.data}",
            f"noise: {self.noise:.4f} = {self.noise_multiplier:g} x the std of "
            f"{self.noise_reference}; "
            f"{self.samples} samples per fact, seed {self.seed}; window {self.window} layers",
            f"mean P(answer): clean {self.p_clean:.4f}, subject corrupted {self.p_corrupted:.4f}",
        ]
        for category in self.categories:
            lines.append(f"average indirect effect at the {category} token, per layer:")
            lines.append("  layer " + " ".join(f"{k:>7}" for k in self.kinds))
            curves = [self.curve(k, category) for k in self.kinds]
            for layer in range(len(curves[0])):
                mark = " <- peak" if category == "last subject" and layer == self.peak_layer else ""
                lines.append(
                    f"  {layer:5d} " + " ".join(f"{c[layer]:+7.4f}" for c in curves) + mark
                )
        if self.peak_layer is not None:
            lo, hi = self.layer_range
            lines.append(
                f"MLP at the last subject token: peak at layer {self.peak_layer}; suggested "
                f"layers {lo}-{hi} (mean effect >= {self.range_fraction:.0%} of the peak)"
            )
        if self.peak_shares:
            top = sorted(self.peak_shares.items(), key=lambda kv: -kv[1])[:4]
            lines.append(
                "peak layer when the facts are resampled (1000 bootstraps): "
                + ", ".join(f"{layer} ({share:.0%})" for layer, share in top)
            )
        return lines

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> AverageTrace:
        return cls(**d)


def answered_correctly(
    model: nn.Module, tok, facts: Sequence[Fact], limit: int | None = None, batch_size: int = 32
) -> tuple[list[Fact], int]:
    """The first ``limit`` facts whose target's first token is the model's greedy next token,
    and how many facts were checked to find them."""
    device = lm.device_of(model)
    kept: list[Fact] = []
    checked = 0
    for start in range(0, len(facts), batch_size):
        batch = facts[start : start + batch_size]
        seqs = [lm.encode(tok, f.text) for f in batch]
        ids, mask = lm.right_pad(seqs, lm.pad_id(tok), device)
        rows = torch.arange(len(seqs), device=device)
        cols = torch.tensor([len(s) - 1 for s in seqs], device=device)
        with torch.no_grad():
            top = lm.logits_at(model, ids, mask, rows, cols).argmax(-1).tolist()
        for f, t in zip(batch, top, strict=True):
            checked += 1
            if t == lm.encode_continuation(tok, f.target)[0]:
                kept.append(f)
                if limit is not None and len(kept) >= limit:
                    return kept, checked
    return kept, checked


def trace_average(
    model: nn.Module,
    tok,
    facts: Sequence[Fact],
    *,
    limit: int | None = 100,
    kinds: Sequence[str] = KINDS,
    categories: Sequence[str] = AVERAGE_CATEGORIES,
    samples: int = AVERAGE_SAMPLES,
    window: int = WINDOW,
    seed: int = 0,
    noise_multiplier: float = NOISE_MULTIPLIER,
    data: str = "",
    progress: bool = True,
) -> AverageTrace:
    """Trace the first ``limit`` facts the model answers correctly and average the effects
    per layer and token category; suggest the layers to edit from the MLP curve at the last
    subject token. The noise is 3 σ of the embeddings of all the facts' subjects (ROME)."""
    kinds = parse_kinds(kinds)
    _check_average(samples, window, noise_multiplier, limit, categories)
    t0 = time.perf_counter()
    noise, reference = noise_level(model, tok, [f.subject for f in facts], noise_multiplier)
    known, checked = answered_correctly(model, tok, list(facts), limit)
    if not known:
        raise EditError(
            f"the model answers none of the {checked} facts correctly: nothing to trace"
        )
    n_layers = arch_table.num_layers(model)
    sums = {k: torch.zeros(n_layers, len(categories), dtype=torch.float64) for k in kinds}
    counts = dict.fromkeys(categories, 0)
    clean = corrupted = 0.0
    rows = []
    run = dict(noise=noise, samples=samples, window=window, seed=seed)
    for fact in tqdm(known, desc="tracing facts", unit="fact", disable=None if progress else True):
        t, curves = _trace_categories(model, tok, fact, kinds, categories, **run)
        per_fact: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        for c, by_kind in curves.items():
            counts[c] += 1
            for k, curve in by_kind.items():
                sums[k][:, categories.index(c)] += curve
                per_fact[k][c] = [round(x, 5) for x in curve.tolist()]
        clean += t.p_clean
        corrupted += t.p_corrupted
        rows.append(_fact_row(fact, t, per_fact))
    effects = {
        k: (s / torch.tensor([max(counts[c], 1) for c in categories])).tolist()
        for k, s in sums.items()
    }
    avg = AverageTrace(
        model=str(getattr(model, "edit_source", type(model).__name__)),
        model_hash=getattr(model, "edit_hash", None),
        data=data,
        n_facts=len(known),
        n_checked=checked,
        kinds=list(kinds),
        categories=list(categories),
        effects=effects,
        counts=counts,
        p_clean=clean / len(known),
        p_corrupted=corrupted / len(known),
        noise=noise,
        noise_reference=reference,
        noise_multiplier=noise_multiplier,
        samples=samples,
        window=window,
        seed=seed,
        seconds=round(time.perf_counter() - t0, 1),
        facts=rows,
    )
    _suggest(avg, seed)
    return avg


def _check_average(
    samples: int, window: int, noise_multiplier: float, limit: int | None, categories
) -> None:
    check_settings(samples, window, noise_multiplier)
    if limit is not None and limit < 1:
        raise EditError(f"limit must be >= 1, got {limit}")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise EditError(f"unknown token categories {bad}: choose from {', '.join(CATEGORIES)}")


def _trace_categories(
    model: nn.Module,
    tok,
    fact: Fact,
    kinds: Sequence[str],
    categories: Sequence[str],
    **settings,
) -> tuple[FactTrace, dict[str, dict[str, torch.Tensor]]]:
    """The trace of one fact at the tokens of ``categories``, and per category present in
    the prompt and per kind the effect curve (layers,), averaged over the category's tokens."""
    _, first, stop = subject_range(tok, fact.prompt, fact.subject)
    cats = category_positions(first, stop, len(lm.encode(tok, fact.text)))
    cats = {c: cats[c] for c in categories if cats[c]}
    t = trace_fact(
        model,
        tok,
        fact.prompt,
        fact.subject,
        fact.target,
        kinds=kinds,
        positions=sorted({p for ps in cats.values() for p in ps}),
        **settings,
    )
    curves = {}
    for c, ps in cats.items():
        cols = [t.positions.index(p) for p in ps]
        curves[c] = {k: t.effect(k)[:, cols].double().mean(1) for k in kinds}
    return t, curves


def _fact_row(fact: Fact, t: FactTrace, effects: dict[str, dict[str, list[float]]]) -> dict:
    """What ``AverageTrace.facts`` keeps of one fact."""
    return {
        "prompt": fact.text,
        "subject": fact.subject,
        "target": fact.target,
        "p_clean": round(t.p_clean, 5),
        "p_corrupted": round(t.p_corrupted, 5),
        "effects": effects,
    }


def _suggest(avg: AverageTrace, seed: int) -> None:
    """The peak layer, its range and the bootstrap peak shares, from the MLP curve at the
    last subject token, when the trace has it."""
    if "mlp" in avg.kinds and "last subject" in avg.categories:
        avg.peak_layer, avg.layer_range = suggest_layers(avg.curve("mlp"))
        curves = [r["effects"]["mlp"]["last subject"] for r in avg.facts]
        avg.peak_shares = peak_shares(curves, seed=seed)


def peak_shares(
    curves: Sequence[Sequence[float]], resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """How often each layer is the peak of the mean curve when the facts are resampled with
    replacement (a bootstrap): how firmly the data pick the peak layer."""
    x = torch.tensor(curves, dtype=torch.float64)  # (facts, layers)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (resamples, len(x)), generator=gen)
    peaks = x[idx].mean(1).argmax(-1)  # (resamples,)
    counts = torch.bincount(peaks, minlength=x.shape[1])
    return {str(i): round(int(n) / resamples, 3) for i, n in enumerate(counts) if n}


def suggest_layers(curve: Sequence[float], fraction: float = RANGE_FRACTION) -> tuple[int, list]:
    """(peak layer, [first, last]): the argmax of the effect curve, and the contiguous
    layers around it whose effect is at least ``fraction`` of the peak's."""
    peak = max(range(len(curve)), key=curve.__getitem__)
    lo = hi = peak
    while lo > 0 and curve[lo - 1] >= fraction * curve[peak]:
        lo -= 1
    while hi < len(curve) - 1 and curve[hi + 1] >= fraction * curve[peak]:
        hi += 1
    return peak, [lo, hi]
