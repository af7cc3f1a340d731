"""Fluency of a changed model: generation entropy of sampled continuations, perplexity of
held-out text. ``edit eval`` reports both; ``edit forget`` / ``edit learn`` the perplexity of
the end of the shipped WikiText-2 text (the default retain set is taken from its start)."""

from __future__ import annotations

from torch import nn

from edit import lm
from edit.evals import metrics as M
from edit.stats import corpus_text

HELDOUT_CHARS = 40_000  # the end of the shipped text that no default retain set reads


def perplexity(model: nn.Module, tok, text: str, n_tokens: int = 2048) -> float:
    """Perplexity of the first ``n_tokens`` tokens of ``text`` under the model."""
    return M.perplexity(lm.text_token_nlls(model, tok, text, n_tokens).tolist())


def heldout_text() -> str:
    """Held-out text for the perplexity of a trained change: the end of the shipped text."""
    return corpus_text()[-HELDOUT_CHARS:]


def fluency(model, tok, prompts: list[str], settings, ppl_text: str | None) -> dict:
    """Generation entropy of sampled continuations of ``prompts`` (``settings.gen_tokens``
    tokens, ``settings.seed``); perplexity of the first ``settings.ppl_tokens`` of
    ``ppl_text``."""
    out: dict = {}
    if prompts:
        texts = lm.sample(model, tok, prompts, settings.gen_tokens, seed=settings.seed)
        out["GE"] = M.generation_entropy(texts)
        out["_generations"] = texts
    if ppl_text:
        out["PPL"] = perplexity(model, tok, ppl_text, settings.ppl_tokens)
    return out
