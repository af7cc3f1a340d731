"""Second-moment statistics of MLP keys, collected once and cached on disk.

ROME and MEMIT whiten the key of an edited fact with C = E[k kᵀ], the uncentred second
moment of the inputs k to the MLP output projection over generic text (Meng et al. 2022,
eq. 2; "C" there). The expectation is over every token of a corpus; here the default corpus
is WikiText-2 (raw validation split) shipped inside the package.

    C = second_moment(model, tok, "model.layers.4.mlp.down_proj")   # (d_in, d_in), float32

The cache key is (model weights hash, module, corpus hash, token count), so a statistic is
reused across processes and can be shared as a file: ``<cache>/stats/<model>/<module>...``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from edit.atomic import save_tensors
from edit.errors import EditError
from edit.hooks import StopForward, Trace
from edit.lm import device_of, start_ids
from edit.models import cache_dir

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "wikitext2-valid"


def corpus_text(corpus: str | os.PathLike = DEFAULT_CORPUS) -> str:
    """The text of a named corpus (the shipped WikiText-2) or of a UTF-8 text file."""
    if str(corpus) == DEFAULT_CORPUS:
        return (files("edit") / "data" / "wikitext2_raw_valid.txt").read_text(encoding="utf-8")
    path = Path(corpus)
    if not path.is_file():
        raise EditError(f"statistics corpus not found: {corpus} (give a UTF-8 text file)")
    return path.read_text(encoding="utf-8")


def token_chunks(tok, text: str, n_tokens: int, seq_len: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens of ``text`` (blank lines dropped) cut into sequences,
    each opened by the model's start token(s) as every prompt is (``lm.start_ids``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ids: list[int] = []
    for start in range(0, len(lines), 200):  # tokenize in pieces: bounded memory, early exit
        ids.extend(
            tok("\n".join(lines[start : start + 200]) + "\n", add_special_tokens=False).input_ids
        )
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        log.warning("corpus has %d tokens, fewer than the %d asked for", len(ids), n_tokens)
    ids = ids[:n_tokens]
    start = list(start_ids(tok))
    return [start + ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def second_moment(
    model: nn.Module,
    tok,
    module_names: str | list[str],
    *,
    corpus: str | os.PathLike = DEFAULT_CORPUS,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """E[k kᵀ] of the inputs of each named module, from cache or from one pass over the corpus.

    Returns a tensor for one name, a dict for a list. All names are collected in the same
    forward passes, which stop after the deepest module.
    """
    single = isinstance(module_names, str)
    names = [module_names] if single else list(module_names)
    text = corpus_text(corpus)
    # Sequences (with their start token) must fit a model with learned positions.
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, max_pos - len(start_ids(tok)))
    corpus_id = (
        f"{Path(str(corpus)).stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}-s{seq_len}"
    )
    model_hash = getattr(model, "edit_hash", None)
    paths = {n: _cache_path(model_hash, n, corpus_id, n_tokens) for n in names}

    found: dict[str, torch.Tensor] = {}
    for n, p in paths.items():
        if p is not None and p.is_file():
            found[n] = load_file(p)["second_moment"]
    missing = [n for n in names if n not in found]
    if missing:
        found.update(_collect(model, tok, missing, text, n_tokens, seq_len, batch_size, progress))
        for n in missing:
            if paths[n] is not None:
                _save(
                    paths[n],
                    found[n],
                    {
                        "module": n,
                        "corpus": corpus_id,
                        "n_tokens": str(n_tokens),
                        "model": model_hash,
                    },
                )
    return found[names[0]] if single else {n: found[n] for n in names}


def _cache_path(model_hash: str | None, module: str, corpus_id: str, n: int) -> Path | None:
    if not model_hash:  # a model that was not loaded by edit.load: nothing safe to key on
        return None
    root = Path(os.environ.get("EDIT_STATS_CACHE") or cache_dir() / "stats")
    return root / model_hash.split(":")[-1][:16] / f"{module}.{corpus_id}.{n}.safetensors"


@torch.no_grad()
def _collect(model, tok, names, text, n_tokens, seq_len, batch_size, progress):
    t0 = time.perf_counter()
    chunks = token_chunks(tok, text, n_tokens, seq_len)
    device = device_of(model)
    # The deepest module ends the forward pass: later blocks are not needed.
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    last = max(names, key=order.__getitem__)
    sums = {n: None for n in names}
    count = 0
    traces = {n: Trace(model, n, retain_input=True, stop=(n == last)) for n in names}
    try:
        bar = tqdm(
            total=sum(map(len, chunks)),
            desc="key statistics",
            unit="tok",
            disable=None if progress else True,
        )
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(batch):
                ids[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c)] = 1
            ids, mask = ids.to(device), mask.to(device)
            try:
                model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
            keep = mask.bool().flatten()
            for n in names:
                k = traces[n].input.flatten(0, -2)[keep].float()  # (tokens, d_in)
                s = (k.T @ k).double()
                sums[n] = s if sums[n] is None else sums[n] + s
            count += int(keep.sum())
            bar.update(int(keep.sum()))
        bar.close()
    finally:
        for t in traces.values():
            t.close()
    log.info(
        "collected key statistics for %d module(s) over %d tokens in %.1fs",
        len(names),
        count,
        time.perf_counter() - t0,
    )
    return {n: (sums[n] / count).float().cpu() for n in names}


def _save(path: Path, tensor: torch.Tensor, meta: dict) -> None:
    save_tensors(path, {"second_moment": tensor}, meta)
