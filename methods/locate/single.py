"""The causal trace of one prompt: every (kind, layer, token) restoration, as a
:class:`FactTrace` with its effects, peaks and a readable summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edit import lm
from edit.errors import EditError
from edit.methods.locate.engine import Engine
from edit.methods.locate.inputs import (
    KINDS,
    NOISE_MULTIPLIER,
    WINDOW,
    check_settings,
    noise_level,
    parse_kinds,
    subject_range,
)

SAMPLES = 10  # noise samples for one fact (ROME)


@dataclass
class FactTrace:
    """The causal trace of one prompt. ``scores[kind][l, j]`` is the mean P(answer) after
    restoring ``kind`` at layer l and token ``positions[j]`` in corrupted runs."""

    prompt: str  # the filled prompt
    subject: str
    target: str  # the answer token traced
    target_id: int
    target_given: bool  # False: the model's own top prediction
    tokens: list[str]  # the prompt's tokens as the model reads them (start token first)
    subject_first: int
    subject_stop: int  # one past the last subject token
    positions: list[int]
    p_clean: float
    p_corrupted: float
    scores: dict[str, torch.Tensor]  # kind -> (layers, len(positions))
    noise: float  # standard deviation
    noise_reference: str  # how it was chosen
    samples: int
    window: int
    seed: int
    seconds: float = 0.0

    @property
    def subject_last(self) -> int:
        return self.subject_stop - 1

    def effect(self, kind: str) -> torch.Tensor:
        """(layers, len(positions)) indirect effects P_restored − P_corrupted."""
        return self.scores[kind] - self.p_corrupted

    def peak(self, kind: str, position: int | None = None) -> tuple[int, int, float]:
        """(layer, token position, effect) of the strongest restoration of ``kind``,
        anywhere or at one token position."""
        eff = self.effect(kind)
        cols = range(len(self.positions))
        if position is not None:
            cols = [self.positions.index(position)]
        layer, col = max(
            ((i, c) for i in range(eff.shape[0]) for c in cols), key=lambda ic: eff[ic]
        )
        return layer, self.positions[col], float(eff[layer, col])

    def summary(self) -> list[str]:
        """What a person wants to read: the answer, the drop, and where it comes back."""
        n = len(self.tokens)
        subj = [repr(t) for t in self.tokens[self.subject_first : self.subject_stop]]
        how = "given" if self.target_given else "the model's top prediction"
        lines = [
            f"prompt: {self.prompt!r} ({n} tokens with the start token)",
            f"subject: {self.subject!r} = tokens {self.subject_first}-{self.subject_last} "
            f"({' '.join(subj)}); answer: {self.target!r} ({how})",
            f"noise: std {self.noise:.4f} ({self.noise_reference}), {self.samples} samples, "
            f"seed {self.seed}; window {self.window} layers for mlp/attn",
            f"P({self.target!r}): clean {self.p_clean:.4f}, subject corrupted "
            f"{self.p_corrupted:.4f}",
        ]
        for kind in self.scores:
            layer, pos, eff = self.peak(kind)
            lines.append(
                f"  strongest {kind:5} restoration: layer {layer:2d} at token {pos} "
                f"{self.tokens[pos]!r}: {eff:+.4f}"
            )
        if "mlp" in self.scores and self.subject_last in self.positions:
            layer, _, eff = self.peak("mlp", self.subject_last)
            share = (
                eff / (self.p_clean - self.p_corrupted) if self.p_clean > self.p_corrupted else 0
            )
            lines.append(
                f"MLP at the last subject token ({self.tokens[self.subject_last]!r}): most "
                f"effect at layer {layer} ({eff:+.4f}, {share:.0%} of the drop restored)"
            )
        return lines

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "scores"}
        d["indirect_effect"] = {k: self.effect(k).tolist() for k in self.scores}
        d["p_restored"] = {k: v.tolist() for k, v in self.scores.items()}
        return d


@torch.no_grad()
def trace_fact(
    model: nn.Module,
    tok,
    prompt: str,
    subject: str,
    target: str | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    noise_multiplier: float = NOISE_MULTIPLIER,
    samples: int = SAMPLES,
    window: int = WINDOW,
    seed: int = 0,
    positions: Sequence[int] | None = None,
    batch_tokens: int = 512,
    progress: bool = False,
) -> FactTrace:
    """Trace one fact: every (kind, layer, token) restoration of ``prompt`` (a template with
    ``{}``) with ``subject`` filled in.

    ``noise`` is the noise's standard deviation (default: ``noise_multiplier`` σ, with σ
    from :func:`noise_level` on WikiText-2);
    ``positions`` limits the restored tokens (default: all); each forward pass computes
    about ``batch_tokens`` new tokens. See the ``edit.methods.locate`` docstring.
    """
    kinds = parse_kinds(kinds)
    check_settings(samples, window, noise_multiplier if noise is None else noise)
    t0 = time.perf_counter()
    reference = "given"
    if noise is None:
        noise, reference = noise_level(model, tok, multiplier=noise_multiplier)
        reference = f"{noise_multiplier:g} x the std of {reference}"
    text, first, stop = subject_range(tok, prompt, subject)
    ids = lm.encode(tok, text)
    length = len(ids)
    positions = list(range(length)) if positions is None else sorted(set(positions))
    if not positions or positions[0] < 0 or positions[-1] >= length:
        raise EditError(f"token positions must lie in 0..{length - 1}, got {positions}")

    engine = Engine(model, ids, first, stop, kinds, window, batch_tokens)
    logits = engine.clean()
    if target is None:
        target_id = int(logits.argmax())
    else:
        target_id = lm.encode_continuation(tok, target)[0]
    p_clean = float(torch.softmax(logits, -1)[target_id])

    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((samples, stop - first, engine.embed_dim), generator=gen) * noise
    p_corrupted = float(engine.corrupted(eps, target_id))

    scores = _restore_all(engine, kinds, positions, first, eps, target_id, p_corrupted, progress)
    return FactTrace(
        prompt=text,
        subject=subject,
        target=tok.decode([target_id]),
        target_id=target_id,
        target_given=target is not None,
        tokens=[tok.decode([i]) for i in ids],
        subject_first=first,
        subject_stop=stop,
        positions=positions,
        p_clean=p_clean,
        p_corrupted=p_corrupted,
        scores=scores,
        noise=noise,
        noise_reference=reference,
        samples=samples,
        window=window,
        seed=seed,
        seconds=time.perf_counter() - t0,
    )


def _restore_all(
    engine: Engine,
    kinds: Sequence[str],
    positions: list[int],
    first: int,
    eps: torch.Tensor,
    target_id: int,
    p_corrupted: float,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """kind -> (layers, len(positions)): mean P(target) with ``kind`` restored at each layer
    and position, in corrupted runs with the noise ``eps``."""
    # Before the first subject token nothing is corrupted: restoring is a no-op (effect 0).
    todo = [
        (kind, layer, pos)
        for pos in positions
        if pos >= first
        for kind in kinds
        for layer in range(engine.n_layers)
    ]
    probs = engine.restored(todo, eps, target_id, progress)
    scores = {k: torch.full((engine.n_layers, len(positions)), p_corrupted) for k in kinds}
    col = {p: j for j, p in enumerate(positions)}
    for (kind, layer, pos), p in zip(todo, probs.tolist(), strict=True):
        scores[kind][layer, col[pos]] = p
    return scores
