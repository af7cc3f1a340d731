"""Does a trained change keep what the model knew? The health of a model before and after
`edit learn` / `edit forget`, and the bounds past which the change is refused.

    guard = Guard(model, tok)               # measures the model as it is now
    ws.learn("docs.jsonl", guard=guard)     # refused (EditFailed), nothing recorded, when the
    guard.before, guard.after               # perplexity or the probe falls past the bounds

Health is the perplexity of held-out text (:func:`edit.evals.fluency.heldout_text`) and how
likely the model finds the answers of a general-knowledge probe: 1,000 true facts of
CounterFact (Meng et al. 2022, MIT) taken in file order, whether the model knows them or not,
shipped as ``edit/data/general_facts.json`` (built by ``benchmarks/make_general_facts.py``;
its subjects are not those of ROME's known_1000.json, which the benchmarks check on). The
figure is the mean, over the facts, of the log-probability of each answer's first token. A
probe of facts the model answers top-1 registers every borderline fact a change of the
weights flips and no fact it brings up: it refused a learn run that kept the known facts as it
refused one that did not (docs/unlearning.md, "What the guard's probe counts").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from torch import nn

from edit import lm
from edit.errors import EditFailed, InvalidRequest
from edit.evals.fluency import heldout_text, perplexity
from edit.facts import Fact
from edit.readers.known import load_known

MAX_PPL_RISE = 0.05  # perplexity may rise by at most 5 %
MAX_ANSWER_DROP = 0.10  # the probe's answers may become at most 10 % less likely


def general_facts() -> list[Fact]:
    """The shipped general-knowledge probe."""
    with resources.as_file(resources.files("edit") / "data" / "general_facts.json") as path:
        return load_known(path)


def first_token_scores(model: nn.Module, tok, facts: list[Fact], batch_size: int = 32
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per fact: (log-probability of its object's first token after the prompt, that token's
    rank among the model's next tokens: 0 where it is the top one)."""
    logps, ranks = [], []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        logp = lm.next_token_logprobs(model, tok, [f.text for f in chunk])
        first = torch.tensor([lm.encode_continuation(tok, f.target)[0] for f in chunk])
        true = logp.gather(1, first.to(logp.device)[:, None])
        logps.append(true[:, 0].float().cpu())
        ranks.append((logp > true).sum(-1).cpu())
    return torch.cat(logps), torch.cat(ranks)


def top1(model: nn.Module, tok, facts: list[Fact], batch_size: int = 32) -> float:
    """Share of ``facts`` whose object's first token is the model's top next token."""
    return float((first_token_scores(model, tok, facts, batch_size)[1] == 0).float().mean())


def answer_logp(model: nn.Module, tok, facts: list[Fact]) -> float:
    """Mean over ``facts`` of the log-probability of the object's first token."""
    return float(first_token_scores(model, tok, facts)[0].mean())


@dataclass(frozen=True)
class Health:
    perplexity: float  # of the held-out text (default: the end of the shipped WikiText-2)
    answer_logp: float  # mean log P(answer) of the general-knowledge probe (first tokens)


def health(model: nn.Module, tok, facts: list[Fact] | None = None, text: str | None = None,
           ) -> Health:  # fmt: skip
    return Health(perplexity(model, tok, text if text is not None else heldout_text()),
                  answer_logp(model, tok, facts or general_facts()))  # fmt: skip


# what a refusal tells the user to change (the settings that trade learning for keeping)
ADVICE = "lower lr or epochs, or raise kl_weight, and run again"


class Guard:
    """Measures :func:`health` now (``before``); called with the changed model, measures it
    again (``after``) and raises :class:`EditFailed` when perplexity rose by more than
    ``max_ppl_rise`` (a fraction) or the probe's answers became less likely by more than
    ``max_answer_drop`` (a fraction of their probability, geometric mean). ``facts``/``text``:
    the probe and the perplexity text (default: the shipped ones); ``refuse=False`` measures
    and reports without raising; ``advice``: what the refusal tells the user to change."""

    def __init__(self, model: nn.Module, tok, *, max_ppl_rise: float = MAX_PPL_RISE,
                 max_answer_drop: float = MAX_ANSWER_DROP, facts: list[Fact] | None = None,
                 text: str | None = None, refuse: bool = True,
                 advice: str = ADVICE) -> None:  # fmt: skip
        for name, value in (("max_ppl_rise", max_ppl_rise), ("max_answer_drop", max_answer_drop)):
            if not value >= 0:
                raise InvalidRequest(f"{name} must be >= 0, got {value}")
        self.tok, self.max_ppl_rise, self.max_answer_drop = tok, max_ppl_rise, max_answer_drop
        self.facts = facts or general_facts()
        self.text, self.refuse, self.advice = text, refuse, advice
        self.before = health(model, tok, self.facts, text)
        self.after: Health | None = None

    def problems(self) -> list[str]:
        """What falls past a bound after the change (empty before it is measured)."""
        if self.after is None:
            return []
        b, a, out = self.before, self.after, []
        rise = a.perplexity / b.perplexity - 1
        if rise > self.max_ppl_rise:
            out.append(f"perplexity rose {100 * rise:.1f} % ({b.perplexity:.2f} -> "
                       f"{a.perplexity:.2f}; bound +{100 * self.max_ppl_rise:g} %)")  # fmt: skip
        drop = -math.expm1(a.answer_logp - b.answer_logp)
        if drop > self.max_answer_drop:
            out.append(f"general facts' answers became {100 * drop:.1f} % less likely "
                       f"(mean log P {b.answer_logp:.3f} -> {a.answer_logp:.3f} over "
                       f"{len(self.facts)} facts; bound {100 * self.max_answer_drop:g} "
                       "%)")  # fmt: skip
        return out

    def __call__(self, model: nn.Module) -> dict:
        """Measure ``model``; refuse it past the bounds, else return what to record."""
        self.after = health(model, self.tok, self.facts, self.text)
        problems = self.problems()
        if self.refuse and problems:
            raise EditFailed(f"not recorded: {'; '.join(problems)}: {self.advice}")
        return {"before": asdict(self.before), "after": asdict(self.after),
                "past_bounds": problems}  # fmt: skip
