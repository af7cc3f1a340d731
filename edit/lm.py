"""Small, batched language-model primitives shared by methods, evaluations and the CLI.

Everything here pads on the right by hand (so positions are known without asking the
tokenizer) and computes the unembedding only at the positions that are asked for: on a
small model the vocabulary projection is a quarter of the forward pass.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@functools.lru_cache(maxsize=16)
def start_ids(tok) -> tuple[int, ...]:
    """Token(s) that open every text we feed the model, so that no prompt word sits at
    position 0.

    Models treat their first position as an attention sink: a subject that lands there is
    barely read (SmolLM2 completes "Paris is the capital of" with " the", but with its
    document separator in front, with " France", p = 0.84), and its MLP key looks unlike
    the same word anywhere else. A tokenizer that adds its own BOS needs nothing more;
    otherwise the document separator ``<|endoftext|>`` is used when the vocabulary has it
    (GPT-2, GPT-NeoX, Qwen, SmolLM families), then the declared BOS token.
    """
    if len(tok("a").input_ids) > len(tok("a", add_special_tokens=False).input_ids):
        return ()
    for token in ("<|endoftext|>", tok.bos_token):
        if token is None:
            continue
        tid = tok.convert_tokens_to_ids(token)
        if tid is not None and tok.convert_ids_to_tokens(tid) == token:
            return (int(tid),)
    return ()


def opens_with_special(tok, text: str) -> bool:
    """Whether ``text`` opens with one of the tokenizer's special tokens, as a rendered chat
    template does (``<|im_start|>``, ``<|begin_of_text|>``): such a text carries its own
    opening and is read exactly as written, with no start token or BOS added."""
    return any(t and text.startswith(t) for t in tok.all_special_tokens)


def encode(tok, text: str) -> list[int]:
    """Token ids of a text as the model reads it: see :func:`start_ids` (and
    :func:`opens_with_special` for rendered chat templates)."""
    if opens_with_special(tok, text):
        return list(tok(text, add_special_tokens=False).input_ids)
    return list(start_ids(tok)) + list(tok(text).input_ids)


def encode_continuation(tok, text: str, after: str = "") -> list[int]:
    """Token ids of ``text`` as it continues the prompt ``after``: a leading space, unless the
    prompt ends a line (an answer opening a chat turn starts without one); no special
    tokens."""
    return list(tok(_continuation(text, after), add_special_tokens=False).input_ids)


def mentions_in_continuation(tok, text: str, span: str, after: str = "") -> list[int]:
    """Indices, in ``encode_continuation(tok, text, after)``, of the last token of each
    occurrence of ``span`` in ``text`` (a subject named again in a reply)."""
    text, offsets = continuation_offsets(tok, text, after)
    out, start = [], text.find(span) if span else -1
    while start >= 0:
        end = start + len(span)
        if (index := _last_token_before(offsets, end)) is not None:
            out.append(index)
        start = text.find(span, end)
    return out


def span_in_continuation(tok, text: str, span: str, after: str = "") -> list[int]:
    """Indices, in ``encode_continuation(tok, text, after)``, of the tokens that hold the
    last occurrence of ``span`` in ``text`` (the object a target sentence ends on); empty
    where ``text`` does not contain it."""
    text, offsets = continuation_offsets(tok, text, after)
    start = text.rfind(span) if span else -1
    if start < 0:
        return []
    end = start + len(span)
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def _continuation(text: str, after: str) -> str:
    return ("" if after.endswith("\n") else " ") + text.strip()


def continuation_offsets(tok, text: str, after: str = "") -> tuple[str, list]:
    """``text`` as it continues ``after`` (:func:`encode_continuation`), and the character
    offsets of its tokens."""
    text = _continuation(text, after)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return text, enc["offset_mapping"]


def pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def right_pad(
    seqs: list[list[int]], pad: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T), padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def last_token_of_span(tok, text: str, end_char: int) -> int:
    """Index, in ``encode(tok, text)``, of the token that holds character ``end_char - 1``:
    the last token of a span ending at ``end_char``."""
    if opens_with_special(tok, text):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        opening = 0
    else:
        enc = tok(text, return_offsets_mapping=True)
        opening = len(start_ids(tok))
    index = _last_token_before(enc["offset_mapping"], end_char)
    if index is None:
        raise ValueError(f"no token covers the span ending at {end_char} in {text!r}")
    return index + opening


def _last_token_before(offsets, end_char: int) -> int | None:
    """Index of the last non-empty token (by character ``offsets``) that starts before
    ``end_char``: the one holding character ``end_char - 1``; None if there is none."""
    index = None
    for i, (start, stop) in enumerate(offsets):
        if stop > start and start < end_char:
            index = i
    return index


def subject_last_index(tok, prompt_template: str, subject: str) -> tuple[str, int]:
    """The filled prompt and the index of the subject's last token in it."""
    text = prompt_template.format(subject)
    end = prompt_template.index("{}") + len(subject)
    return text, last_token_of_span(tok, text, end)


def device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cache=None,
) -> torch.Tensor:
    """Next-token logits (N, V) at positions (rows[n], cols[n]), in float32.

    Runs the base model once and applies the output embedding only where needed; applies
    final logit soft-capping when the config asks for it (Gemma 2/3). With ``cache`` (from
    :func:`prefix_cache`), ``input_ids`` continue the cached tokens: ``attention_mask``
    covers both, ``position_ids`` the new ones; the cache grows by the new tokens.
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if cache is not None:
        extra.update({cache_kwarg(model): cache, "use_cache": True})
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    return unembed(model, out.last_hidden_state[rows, cols])  # (N, d) -> (N, V)


@functools.cache
def _cache_kwarg(forward_class: type) -> str:
    params = inspect.signature(forward_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The name of the base model's key/value-cache argument (transformers 5 renamed
    ``past_key_values`` to ``cache``)."""
    return _cache_kwarg(type(model.base_model))


@torch.no_grad()
def prefix_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
):
    """The key/value cache of a batch of (left-padded) prefixes, for :func:`logits_at` to
    continue; copy it (``copy.deepcopy``) to continue it more than once."""
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
    )
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


@contextmanager
def eager_attention_on_cpu(model: nn.Module):
    """Inside, a CPU model that runs PyTorch's fused attention (``sdpa``) runs the plain
    matrix-product attention instead; elsewhere nothing changes.

    On CPU the fused kernel's backward pass is slow for the short rows an edit optimizes
    (a third of a MEMIT value optimization's time on SmolLM2); the plain attention computes
    the same function and its backward is two small matrix products.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = (
        current == "sdpa"
        and device_of(model).type == "cpu"
        and hasattr(model, "set_attn_implementation")
        and model._can_set_attn_implementation()
    )
    if not switch:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def empty_cache(model: nn.Module):
    """An empty key/value cache for ``model`` to fill, with the layer kinds (full or sliding
    window) its config declares, as the model builds for itself."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) in float32 from final hidden states (..., d), soft-capped when the
    config asks for it (Gemma 2/3)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class ContinuationScore:
    """Teacher-forced scores of one continuation: per token, its log-probability and the
    token the model would have predicted instead (top-1)."""

    targets: torch.Tensor  # (L,) the continuation's token ids
    logprobs: torch.Tensor  # (L,) float32
    top1: torch.Tensor  # (L,) argmax predictions at the same positions
    next_logprobs: torch.Tensor | None = None  # (V,) the distribution after the prompt

    @property
    def mean_nll(self) -> float:
        """The continuation's mean token negative log-likelihood."""
        return -float(self.logprobs.mean())


@torch.no_grad()
def continuation_scores(
    model: nn.Module,
    tok,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 32,
    next_distribution: bool = False,
) -> list[ContinuationScore]:
    """Score each continuation after its prompt, batched; one result per pair. With
    ``next_distribution``, each result also holds the full next-token log-probabilities
    after its prompt (what :func:`next_token_logprobs` returns, from the same pass)."""
    device = device_of(model)
    results: list[ContinuationScore] = []
    for start in range(0, len(prompts), batch_size):
        seqs, rows, cols, targets, lengths = [], [], [], [], []
        pairs = zip(
            prompts[start : start + batch_size],
            continuations[start : start + batch_size],
            strict=True,
        )
        for b, (p, c) in enumerate(pairs):
            p_ids, c_ids = encode(tok, p), encode_continuation(tok, c, after=p)
            seqs.append(p_ids + c_ids)
            for j, t in enumerate(c_ids):
                rows.append(b)
                cols.append(len(p_ids) + j - 1)
                targets.append(t)
            lengths.append(len(c_ids))
        ids, mask = right_pad(seqs, pad_id(tok), device)
        logits = logits_at(
            model, ids, mask, torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        )
        target_t = torch.tensor(targets, device=device)
        full = torch.log_softmax(logits, -1)
        lp = full.gather(1, target_t[:, None])[:, 0]
        top1 = logits.argmax(-1)
        parts = zip(
            target_t.cpu().split(lengths),
            lp.cpu().split(lengths),
            top1.cpu().split(lengths),
            full.split(lengths),
            strict=True,
        )
        results.extend(
            ContinuationScore(t, lps, h, f[0].cpu() if next_distribution else None)
            for t, lps, h, f in parts
        )
    return results


def continuation_logprobs(
    model: nn.Module, tok, prompts: list[str], continuations: list[str], batch_size: int = 32
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation after its prompt (teacher forced)."""
    return [s.logprobs for s in continuation_scores(model, tok, prompts, continuations, batch_size)]


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tok, prompts: list[str]) -> torch.Tensor:
    """(N, V) log-probabilities of the token after each prompt, float32, on the CPU."""
    device = device_of(model)
    seqs = [encode(tok, p) for p in prompts]
    ids, mask = right_pad(seqs, pad_id(tok), device)
    rows = torch.arange(len(seqs), device=device)
    cols = torch.tensor([len(s) - 1 for s in seqs], device=device)
    return torch.log_softmax(logits_at(model, ids, mask, rows, cols), -1).cpu()


def _generate(model: nn.Module, tok, prompts: list[str], max_new_tokens: int, **how) -> list[str]:
    """Continuations of a batch of prompts, left-padded (positions follow the mask)."""
    device = device_of(model)
    seqs = [encode(tok, p) for p in prompts]
    width = max(map(len, seqs))
    pad = pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **how
    )
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


@torch.no_grad()
def sample(
    model: nn.Module,
    tok,
    prompts: list[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """Top-k sampled continuations (ROME's generation setting), reproducible by seed."""
    device = device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _generate(model, tok, prompts, max_new_tokens, do_sample=True, top_k=top_k)


@torch.no_grad()
def text_token_nlls(
    model: nn.Module, tok, text: str, n_tokens: int, seq_len: int = 512, batch_size: int = 4
) -> torch.Tensor:
    """Token NLLs of the first ``n_tokens`` tokens of ``text``, in windows of ``seq_len``,
    each opened by the start token (so every scored token has context from its window)."""
    device = device_of(model)
    ids = tok(text, add_special_tokens=False).input_ids[:n_tokens]
    start = list(start_ids(tok))
    windows = [start + ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    nlls = []
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        x, mask = right_pad(batch, pad_id(tok), device)
        rows = torch.cat([torch.full((len(w) - 1,), i) for i, w in enumerate(batch)]).to(device)
        cols = torch.cat([torch.arange(len(w) - 1) for w in batch]).to(device)
        targets = torch.cat([torch.tensor(w[1:]) for w in batch]).to(device)
        logits = logits_at(model, x, mask, rows, cols)
        nlls.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
    return torch.cat(nlls)


def sequence_prob(logprobs: torch.Tensor) -> float:
    """Probability of a whole continuation: exp of the summed token log-probabilities."""
    return float(logprobs.sum().exp())


@torch.no_grad()
def greedy(
    model: nn.Module, tok, prompts: list[str], max_new_tokens: int = 12, batch_size: int = 32
) -> list[str]:
    """Greedy continuations (the text after each prompt), ``batch_size`` prompts at a time.
    Prompts of one length share a batch, so most batches need no padding at all."""
    order = sorted(range(len(prompts)), key=lambda i: len(encode(tok, prompts[i])))
    outs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = _generate(model, tok, [prompts[i] for i in chunk], max_new_tokens, do_sample=False)
        for i, text in zip(chunk, texts, strict=True):
            outs[i] = text
    return outs


@torch.no_grad()
def top_next(model: nn.Module, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after ``prompt`` with their probabilities."""
    device = device_of(model)
    ids = torch.tensor([encode(tok, prompt)], device=device)
    logits = logits_at(
        model,
        ids,
        torch.ones_like(ids),
        torch.tensor([0], device=device),
        torch.tensor([ids.shape[1] - 1], device=device),
    )
    probs = torch.softmax(logits[0], -1)
    values, indices = probs.topk(k)
    return [(tok.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
