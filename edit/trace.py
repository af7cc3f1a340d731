"""Causal tracing: which hidden states carry a fact (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", §2 and Appendix B).

    t = trace_fact(model, tok, "{} is located in", "The Eiffel Tower")
    t.effect("mlp")              # (layers, tokens): P_restored(answer) - P_corrupted(answer)
    t.peak("mlp", t.subject_last)   # (layer, token, effect): the strongest MLP restoration

    avg = trace_average(model, tok, load_known("known_1000.json"), limit=100)
    avg.peak_layer, avg.layer_range   # where the MLP at the last subject token matters most

Three kinds of run per fact, all on the prompt as ``lm.encode`` gives it (start token first):

* clean: the prompt as it is; every block, MLP and attention output is kept;
* corrupted: Gaussian noise of standard deviation ν is added to the embedding of every
  subject token, so the model loses track of the subject and P(answer) drops;
* restored: a corrupted run in which one clean state is copied back: the block output
  ("resid"), the MLP output ("mlp") or the attention output ("attn") at one token and layer.

The indirect effect of a state is P_restored(answer) − P_corrupted(answer), averaged over the
noise samples; "answer" is the first token of the target (the model's own top prediction
when no target is given), as in ROME.

Choices, as ROME makes them unless said otherwise:

* noise ν = 3 σ, σ the standard deviation of the embedding-module outputs of the subjects'
  tokens: over all subjects of the data file for ``trace_average`` (ROME's reference), over
  the first 20,000 tokens of the shipped WikiText-2 for a single prompt (for SmolLM2-135M
  σ = 0.113 there against 0.117 over the subjects of ROME's known_1000.json). The noise comes
  from ``torch.Generator().manual_seed(seed)``, drawn anew for each fact, so a run repeats
  exactly.
* samples: 10 noisy runs per restoration for one fact (ROME's number); ``trace_average``
  defaults to 2, since its curve averages over facts as well (on 20 facts of SmolLM2-135M the
  MLP curve from 2 samples is within 0.008 of the one from 10, with the same peak and range).
* window: "mlp" and "attn" restore a window of 10 consecutive layers, l − 5 … l + 4 clipped
  to the model (ROME's ``window=10``); "resid" restores the one block output. ``window=1``
  restores single layers.
* tokens before the first subject token are not run: the noise cannot reach them (the model
  is causal), so restoring them changes nothing and their effect is exactly 0.
* speed: the restorations of token t all share the corrupted run of the tokens before t; it
  runs once per noise sample and its key/value cache is reused, so each restored run computes
  only tokens t … end, many restorations per batch.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from edit import arch as arch_table
from edit import lm
from edit.atomic import write_bytes, write_json
from edit.cache import cache_dir
from edit.errors import EditError
from edit.facts import Fact, _guess_subject
from edit.hooks import Trace

log = logging.getLogger(__name__)

KINDS = ("resid", "mlp", "attn")
NOISE_MULTIPLIER = 3.0  # ν = 3 σ (ROME, §2)
SAMPLES = 10  # noise samples for one fact (ROME)
AVERAGE_SAMPLES = 2  # noise samples per fact when averaging over many facts
WINDOW = 10  # layers restored together for "mlp" and "attn" (ROME)
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
_NOISE_REFERENCE_TOKENS = 20_000


# --------------------------------------------------------------------------- inputs


def parse_kinds(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one kind, or a comma-separated list, as a tuple of kinds in KINDS order."""
    parts = kind.split(",") if isinstance(kind, str) else list(kind)
    parts = [p.strip().lower() for p in parts if p.strip()]
    if parts == ["all"]:
        return KINDS
    unknown = [p for p in parts if p not in KINDS]
    if unknown or not parts:
        raise EditError(f"unknown --kind {kind!r}: use all, mlp, attn or resid")
    return tuple(k for k in KINDS if k in parts)


def parse_prompt(prompt: str, subject: str | None = None) -> tuple[str, str]:
    """(template with ``{}``, subject) from a prompt such as "The Eiffel Tower is located in"
    or "[The Eiffel Tower] is located in"; ``subject`` overrides the guess."""
    text = " ".join(prompt.split())
    if not text:
        raise EditError("the prompt is empty: give one, e.g. 'The Eiffel Tower is located in'")
    if "[" in text or "]" in text:
        start, end = text.find("["), text.find("]")
        if not 0 <= start < end or text.count("[") != 1 or text.count("]") != 1:
            raise EditError(
                f"mark the subject with one pair of brackets, e.g. "
                f"'[The Eiffel Tower] is located in' (got {prompt!r})"
            )
        subject = subject or text[start + 1 : end].strip()
        text = text[:start] + text[start + 1 : end] + text[end + 1 :]
    if subject is None:
        subject = _guess_subject(text)
        if subject is None:
            raise EditError(
                f"cannot tell the subject in {prompt!r}: mark it with brackets, e.g. "
                f"'[The Eiffel Tower] is located in', or pass --subject"
            )
    subject = subject.strip()
    if not subject or subject not in text:
        raise EditError(f"subject {subject!r} does not occur in the prompt {text!r}")
    at = text.index(subject)
    return text[:at] + "{}" + text[at + len(subject) :], subject


def load_known(path: str | os.PathLike) -> list[Fact]:
    """Facts from a JSON list of ``{"prompt", "subject", "attribute"}`` records (ROME's
    ``known_1000.json``; ``"target"`` may stand for ``"attribute"``)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EditError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EditError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise EditError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise EditError(f"{path}: expected a non-empty JSON list of facts (known_1000.json format)")
    facts = []
    for i, r in enumerate(records):
        target = r.get("attribute", r.get("target")) if isinstance(r, dict) else None
        if not isinstance(r, dict) or not r.get("prompt") or not r.get("subject") or not target:
            raise EditError(
                f"{path}: record {i} needs 'prompt', 'subject' and 'attribute' "
                f"(ROME's known_1000.json format)"
            )
        try:
            facts.append(Fact.from_dict({**r, "target": target}))
        except EditError as e:
            raise EditError(f"{path}: record {i}: {e}") from None
    return facts


def noise_level(
    model: nn.Module,
    tok,
    subjects: Sequence[str] | None = None,
    multiplier: float = NOISE_MULTIPLIER,
) -> tuple[float, str]:
    """(ν, what σ was measured on): ``multiplier`` × the standard deviation of the embedding
    module's outputs over the tokens of ``subjects``, or over WikiText-2 tokens without."""
    if subjects:
        ids = [i for s in subjects for i in tok(s, add_special_tokens=False).input_ids]
        reference = f"the {len(ids)} subject tokens of {len(subjects)} facts"
    else:
        from edit.stats import corpus_text

        ids = tok(corpus_text()[:400_000], add_special_tokens=False).input_ids
        ids = ids[:_NOISE_REFERENCE_TOKENS]
        reference = f"{len(ids)} tokens of WikiText-2"
    embed = model.get_submodule(arch_table.lookup(model).embed)
    with torch.no_grad():
        e = embed(torch.tensor([ids], device=lm.device_of(model))).float()  # (1, n, d)
    return multiplier * float(e.std()), reference


def subject_range(tok, prompt: str, subject: str) -> tuple[str, int, int]:
    """(filled prompt, first, last + 1): the subject's token positions in ``lm.encode``."""
    text = prompt.format(subject)
    start = prompt.index("{}")
    end = start + len(subject)
    enc = tok(text, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hits:
        raise EditError(f"no token of {text!r} covers the subject {subject!r}")
    shift = len(lm.start_ids(tok))
    return text, hits[0] + shift, hits[-1] + 1 + shift


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


def window_layers(kind: str, layer: int, n_layers: int, window: int) -> list[int]:
    """The layers restored for (kind, layer): ROME's window l − w//2 … l + ⌈w/2⌉ − 1."""
    if kind == "resid":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


# --------------------------------------------------------------------------- one fact


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
    about ``batch_tokens`` new tokens. See the module docstring.
    """
    kinds = parse_kinds(kinds)
    _check(samples, window, noise_multiplier if noise is None else noise)
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

    engine = _Engine(model, ids, first, stop, kinds, window, batch_tokens)
    logits = engine.clean()
    if target is None:
        target_id = int(logits.argmax())
    else:
        target_id = lm.encode_continuation(tok, target)[0]
    p_clean = float(torch.softmax(logits, -1)[target_id])

    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((samples, stop - first, engine.embed_dim), generator=gen) * noise
    p_corrupted = float(engine.corrupted(eps, target_id))

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


def _check(samples: int, window: int, noise: float) -> None:
    if samples < 1:
        raise EditError(f"samples must be >= 1, got {samples}")
    if window < 1:
        raise EditError(f"window must be >= 1, got {window}")
    if not noise >= 0:
        raise EditError(f"noise must be >= 0, got {noise}")


class _Engine:
    """The forward passes of one prompt's trace, with hooks on the embedding (noise) and on
    every traced module (capture in the clean run, restore in the others)."""

    def __init__(self, model, ids, first, stop, kinds, window, batch_tokens):
        self.model, self.first, self.stop = model, first, stop
        self.ids = torch.tensor(ids, device=lm.device_of(model))  # (T,)
        self.kinds, self.window, self.batch_tokens = kinds, window, batch_tokens
        arch = arch_table.lookup(model)
        self.n_layers = arch_table.num_layers(model)
        name_of = {"resid": arch.block, "mlp": arch.mlp_name, "attn": arch.attn_name}
        self.names = {
            (k, layer): name_of[k](layer) for k in kinds for layer in range(self.n_layers)
        }
        self.embed_name = arch.embed
        self.shape = (0, 0)  # (B, T_in) of the current forward pass
        self.embed_dim = 0  # width of the embedding output (OPT may project it up later)
        self.clean_states: dict[str, torch.Tensor] = {}  # module -> (T, d)
        # What the hooks do in the current forward pass:
        self.capture = False
        self.offset = 0  # absolute position of the first input token
        self.noise: torch.Tensor | None = None  # (B, n_subject, d) per row, None: clean run
        self.restore: dict[str, torch.Tensor] = {}  # module -> rows that restore it
        self.position = 0  # the absolute position restored in this pass

    # The hooks -------------------------------------------------------------------------

    def _hooks(self) -> list[Trace]:
        hooks = [Trace(self.model, self.embed_name, edit_output=self._add_noise)]
        for name in self.names.values():
            hooks.append(Trace(self.model, name, edit_output=self._module_hook(name)))
        return hooks

    def _add_noise(self, out: torch.Tensor) -> torch.Tensor:  # (B, T_in, d)
        self.shape = out.shape[:2]  # the embedding runs first: later hooks read this
        self.embed_dim = out.shape[-1]
        if self.noise is None:
            return out
        lo, hi = max(self.first, self.offset), min(self.stop, self.offset + out.shape[1])
        if lo >= hi:
            return out
        out = out.clone()
        out[:, lo - self.offset : hi - self.offset] += self.noise[
            :, lo - self.first : hi - self.first
        ].to(out.dtype)
        return out

    def _module_hook(self, name: str):
        def hook(out):
            main = out[0] if isinstance(out, tuple) else out  # (B, T_in, d)
            flat = main.dim() == 2  # OPT runs its MLP on (B·T_in, d)
            if flat:
                main = main.view(*self.shape, -1)
            if self.capture:
                self.clean_states[name] = main[0].detach().clone()
                return out
            rows = self.restore.get(name)
            if rows is None:
                return out
            main = main.clone()
            main[rows, self.position - self.offset] = self.clean_states[name][self.position]
            if flat:
                main = main.view(-1, main.shape[-1])
            return (main, *out[1:]) if isinstance(out, tuple) else main

        return hook

    def _forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits at the last position, (B, V); with ``cache``, ``ids`` continue it."""
        out = self.model.base_model(
            input_ids=ids, use_cache=cache is not None, **{lm.cache_kwarg(self.model): cache}
        )
        return lm.unembed(self.model, out.last_hidden_state[:, -1])

    def _run(self, fn):
        hooks = self._hooks()
        try:
            return fn()
        finally:
            for h in hooks:
                h.close()
            self.capture, self.noise, self.restore, self.offset = False, None, {}, 0

    # The runs --------------------------------------------------------------------------

    def clean(self) -> torch.Tensor:
        """Next-token logits (V,) of the clean prompt; keeps every traced module's output."""

        def run():
            self.capture = True
            return self._forward(self.ids[None])[0]

        return self._run(run)

    def corrupted(self, eps: torch.Tensor, target_id: int) -> torch.Tensor:
        """Mean P(target) over the noise samples, nothing restored."""

        def run():
            self.noise = eps.to(self.ids.device)
            logits = self._forward(self.ids[None].expand(len(eps), -1))
            return torch.softmax(logits, -1)[:, target_id].mean()

        return self._run(run)

    def restored(self, todo, eps, target_id, progress) -> torch.Tensor:
        """Mean P(target) over the noise samples for each (kind, layer, position) in todo."""
        eps = eps.to(self.ids.device)
        n_samples = len(eps)
        sums = torch.zeros(len(todo), dtype=torch.float64)
        by_position: dict[int, list[int]] = {}
        for i, (_, _, pos) in enumerate(todo):
            by_position.setdefault(pos, []).append(i)
        bar = tqdm(
            total=len(todo) * n_samples,
            desc="causal trace",
            unit="run",
            disable=None if progress else True,
        )

        def run():
            for pos, items in by_position.items():
                # The corrupted run of the tokens before pos, once per sample: every
                # restoration at pos continues from its key/value cache.
                self.noise, self.offset, self.restore = eps, 0, {}
                prefix = None
                if pos > 0:
                    out = self.model.base_model(
                        input_ids=self.ids[None, :pos].expand(n_samples, -1), use_cache=True
                    )
                    prefix = getattr(out, "cache", None)
                    if prefix is None:
                        prefix = out.past_key_values
                rows = [(i, s) for i in items for s in range(n_samples)]
                # Batches of about batch_tokens new tokens: short suffixes, many rows.
                size = max(1, self.batch_tokens // (len(self.ids) - pos))
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    sample = torch.tensor([s for _, s in chunk], device=self.ids.device)
                    cache = None
                    if prefix is not None:
                        cache = copy.deepcopy(prefix)
                        cache.batch_select_indices(sample)
                    self.noise, self.offset, self.position = eps[sample], pos, pos
                    self.restore = self._restore_plan([todo[i] for i, _ in chunk])
                    suffix = self.ids[None, pos:].expand(len(chunk), -1)
                    p = torch.softmax(self._forward(suffix, cache), -1)[:, target_id]
                    index = torch.tensor([i for i, _ in chunk])
                    sums.index_add_(0, index, p.double().cpu())
                    bar.update(len(chunk))

        try:
            self._run(run)
        finally:
            bar.close()
        return (sums / n_samples).float()

    def _restore_plan(self, items) -> dict[str, torch.Tensor]:
        rows: dict[str, list[int]] = {}
        for row, (kind, layer, _) in enumerate(items):
            for j in window_layers(kind, layer, self.n_layers, self.window):
                rows.setdefault(self.names[kind, j], []).append(row)
        return {n: torch.tensor(r, device=self.ids.device) for n, r in rows.items()}


# --------------------------------------------------------------------------- many facts


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
    _check(samples, window, noise_multiplier)
    if limit is not None and limit < 1:
        raise EditError(f"limit must be >= 1, got {limit}")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise EditError(f"unknown token categories {bad}: choose from {', '.join(CATEGORIES)}")
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
    for fact in tqdm(known, desc="tracing facts", unit="fact", disable=None if progress else True):
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
            noise=noise,
            samples=samples,
            window=window,
            seed=seed,
            positions=sorted({p for ps in cats.values() for p in ps}),
        )
        per_fact: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        for c, ps in cats.items():
            cols = [t.positions.index(p) for p in ps]
            counts[c] += 1
            for k in kinds:
                curve = t.effect(k)[:, cols].double().mean(1)  # (layers,)
                sums[k][:, categories.index(c)] += curve
                per_fact[k][c] = [round(x, 5) for x in curve.tolist()]
        clean += t.p_clean
        corrupted += t.p_corrupted
        rows.append(
            {
                "prompt": fact.text,
                "subject": fact.subject,
                "target": fact.target,
                "p_clean": round(t.p_clean, 5),
                "p_corrupted": round(t.p_corrupted, 5),
                "effects": per_fact,
            }
        )
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
    if "mlp" in kinds and "last subject" in categories:
        avg.peak_layer, avg.layer_range = suggest_layers(avg.curve("mlp"))
        curves = [r["effects"]["mlp"]["last subject"] for r in rows]
        avg.peak_shares = peak_shares(curves, seed=seed)
    return avg


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


# --------------------------------------------------------------------------- cache


def cache_path(model_hash: str) -> Path:
    """Where the averaged trace of a model (by weights hash) is kept."""
    return cache_dir() / "traces" / f"{model_hash.split(':')[-1][:16]}.json"


def save_cached(avg: AverageTrace) -> Path | None:
    """Keep ``avg`` as this model's trace (for layer choice); None when it cannot be keyed
    (a model not loaded by ``edit.load``) or suggests no layer."""
    if not avg.model_hash or avg.peak_layer is None:
        return None
    path = cache_path(avg.model_hash)
    write_json(path, avg.to_dict())
    return path


def cached_layer(model: nn.Module) -> tuple[int, list[int], Path] | None:
    """(suggested layer, layer range, file) from this model's cached trace, if any."""
    model_hash = getattr(model, "edit_hash", None)
    if not model_hash:
        return None
    path = cache_path(model_hash)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    layer = d.get("peak_layer")
    if d.get("model_hash") != model_hash or not isinstance(layer, int):
        return None
    if not 0 <= layer < arch_table.num_layers(model):
        return None
    return layer, d.get("layer_range") or [layer, layer], path


# --------------------------------------------------------------------------- plots


class PlotsUnavailable(EditError):
    """matplotlib is not installed."""


def _figure(**kw):
    try:
        from matplotlib.figure import Figure  # the Agg canvas: no display, no global state
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'edit[plots]' (the numbers are in the JSON)"
        ) from None
    return Figure(**kw)


def _save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buf.getvalue())
    return path


_TITLES = {"resid": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}
_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def plot_fact(t: FactTrace, out_dir: str | os.PathLike) -> list[Path]:
    """One heat map per kind (tokens × layers, as in ROME's figures): ``trace_<kind>.png``."""
    paths = []
    labels = [
        repr(t.tokens[p]) + (" *" if t.subject_first <= p < t.subject_stop else "")
        for p in t.positions
    ]
    for kind in t.scores:
        eff = t.effect(kind).T.numpy()  # (positions, layers)
        fig = _figure(figsize=(1.2 + 0.22 * eff.shape[1], 1.2 + 0.3 * len(labels)))
        ax = fig.add_subplot()
        im = ax.imshow(eff, cmap=_CMAPS[kind], aspect="auto", vmin=min(0.0, float(eff.min())))
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer" + (f" (window {t.window} centred here)" if kind != "resid" else ""))
        ax.set_title(
            f"restoring the {_TITLES[kind]}\n{t.prompt!r} -> {t.target!r}; * = subject",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, label=f"P({t.target.strip()}) - P corrupted")
        paths.append(_save_figure(fig, Path(out_dir) / f"trace_{kind}.png"))
    return paths


def plot_average(avg: AverageTrace, path: str | os.PathLike) -> Path:
    """Average indirect effect per layer, one panel per kind, one line per token category;
    the suggested layer range shaded on the MLP panel."""
    fig = _figure(figsize=(4.2 * len(avg.kinds), 3.6), layout="constrained")
    for i, kind in enumerate(avg.kinds):
        ax = fig.add_subplot(1, len(avg.kinds), i + 1)
        for category in avg.categories:
            ax.plot(avg.curve(kind, category), marker=".", label=f"{category} token")
        if kind == "mlp" and avg.layer_range:
            ax.axvspan(avg.layer_range[0] - 0.4, avg.layer_range[1] + 0.4, alpha=0.15)
            ax.axvline(avg.peak_layer, ls=":", c="k")
        title = f"restoring the {_TITLES[kind]}"
        if kind == "mlp" and avg.layer_range:
            lo, hi = avg.layer_range
            title += f"\npeak layer {avg.peak_layer}, suggested {lo}-{hi} (shaded)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer" + (f" (window of {avg.window})" if kind != "resid" else ""))
        ax.axhline(0, c="0.7", lw=0.5)
        if i == 0:
            ax.set_ylabel("average indirect effect")
            ax.legend(fontsize=8)
    fig.suptitle(f"{avg.model}: {avg.n_facts} known facts, {avg.samples} noise samples each")
    return _save_figure(fig, Path(path))


def write_outputs(
    result: FactTrace | AverageTrace, out_dir: str | os.PathLike
) -> tuple[list[Path], str | None]:
    """The numbers (JSON) and plots (PNG) of a trace in ``out_dir``: the paths written, and
    why the plots are missing, if they are."""
    out = Path(out_dir)
    if isinstance(result, FactTrace):
        paths = [write_json(out / "trace.json", result.to_dict())]
        try:
            return paths + plot_fact(result, out), None
        except PlotsUnavailable as e:
            return paths, str(e)
    paths = [write_json(out / "average_trace.json", result.to_dict())]
    try:
        return paths + [plot_average(result, out / "average_trace.png")], None
    except PlotsUnavailable as e:
        return paths, str(e)
