"""Second-moment statistics of MLP keys, collected once and cached on disk.

ROME and MEMIT whiten the key of an edited fact with C = E[k kᵀ], the uncentred second
moment of the inputs k to the MLP output projection over generic text (Meng et al. 2022,
eq. 2; "C" there). The expectation is over every token of a corpus; here the default corpus
is WikiText-2 (raw validation split) shipped inside the package, and any text can be given
(:func:`edit.readers.text.text_source`: a .txt / .jsonl / .parquet file or a ``datasets`` name).

    C = second_moment(model, tok, "model.layers.4.mlp.down_proj")   # (d_in, d_in), float32
    C = second_moment(model, tok, name, corpus="my-text.parquet", n_tokens=10_000_000)

The cache key is (model weights hash, module, corpus name and hash, token count), so a
statistic is reused across processes and can be shared as a file:
``<cache>/stats/<model>/<module>.<corpus>-<hash>-s<seq_len>.<tokens>.safetensors``.

Under ``accelerate launch`` (or torchrun) each process runs every ``world``-th batch of the
corpus, and the float64 sums are reduced once at the end: the result, and the file the main
process writes, are those of one process to float64 round-off. A long collection saves its
partial sums every ``checkpoint_every`` batches (one file per process) and picks them up
again when it is run after an interruption.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from edit import cache, distributed
from edit.atomic import save_tensors
from edit.errors import EditError
from edit.hooks import StopForward, Trace
from edit.lm import device_of, start_ids
from edit.readers.text import DEFAULT_TEXT, TextSource, shipped_text, text_source

log = logging.getLogger(__name__)

DEFAULT_CORPUS = DEFAULT_TEXT
CHECKPOINT_EVERY = 100  # batches between saved partial sums (8 x 256 tokens each by default)


def corpus_text(corpus: str | os.PathLike = DEFAULT_CORPUS) -> str:
    """The whole text of a named corpus (the shipped WikiText-2) or of a UTF-8 text file."""
    if str(corpus) == DEFAULT_CORPUS:
        return shipped_text()
    path = Path(corpus)
    if not path.is_file():
        raise EditError(f"statistics corpus not found: {corpus} (give a UTF-8 text file)")
    return path.read_text(encoding="utf-8")


def token_chunks(tok, text: str | Iterable[str], n_tokens: int, seq_len: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens of ``text`` (a string or its lines; blank lines dropped)
    cut into sequences, each opened by the model's start token(s) as every prompt is
    (``lm.start_ids``)."""
    lines = text.splitlines() if isinstance(text, str) else text
    ids: list[int] = []
    group: list[str] = []

    def flush() -> None:
        ids.extend(tok("\n".join(group) + "\n", add_special_tokens=False).input_ids)
        group.clear()

    for line in lines:  # tokenized 200 lines at a time: bounded memory, early exit
        line = line.strip()
        if not line:
            continue
        group.append(line)
        if len(group) == 200:
            flush()
            if len(ids) >= n_tokens:
                break
    if group and len(ids) < n_tokens:
        flush()
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
    corpus: str | os.PathLike | TextSource = DEFAULT_CORPUS,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """E[k kᵀ] of the inputs of each named module, from cache or from one pass over the corpus.

    Returns a tensor for one name, a dict for a list. All names are collected in the same
    forward passes, which stop after the deepest module. ``corpus``: see
    :func:`edit.readers.text.text_source`.
    """
    single = isinstance(module_names, str)
    names = [module_names] if single else list(module_names)
    source = corpus if isinstance(corpus, TextSource) else text_source(corpus)
    seq_len = _fitted_seq_len(model, tok, seq_len)
    corpus_id = _corpus_id(source, seq_len)
    model_hash = getattr(model, "edit_hash", None)
    paths = {n: _cache_path(model_hash, n, corpus_id, n_tokens) for n in names}

    found: dict[str, torch.Tensor] = {}
    for n in names:
        stored = cache.find("stats", model_hash, *_cache_key(n, corpus_id, n_tokens),
                            ext="safetensors")  # fmt: skip
        if stored is not None:
            found[n] = load_file(stored)["second_moment"]
    missing = [n for n in names if n not in found]
    if not missing:
        log.info("key statistics of %d module(s) from the cache (%s)", len(names), corpus_id)
        return found[names[0]] if single else {n: found[n] for n in names}
    partial = None
    if model_hash:  # where this process keeps its partial sums while it collects
        rank, world = distributed.rank_and_size()
        key = hashlib.sha256("|".join(missing).encode()).hexdigest()[:12]
        partial = (
            cache.root("stats") / cache.model_key(model_hash) / "partial"
            / f"{key}.{corpus_id}.{n_tokens}.b{batch_size}.r{rank}of{world}.safetensors"
        )  # fmt: skip
    run = _Collection(model, missing, batch_size, len(start_ids(tok)), progress, partial,
                      checkpoint_every)  # fmt: skip
    chunks = token_chunks(tok, source.lines(), n_tokens, seq_len)
    found.update(run.collect(chunks, source.description))
    if distributed.is_main():
        for n in missing:
            if paths[n] is not None:
                meta = {"module": n, "corpus": corpus_id, "n_tokens": str(n_tokens)}
                _save(paths[n], found[n], {**meta, "model": model_hash})
    distributed.wait_for_everyone()  # the files are written: the partial sums may go
    if partial is not None:
        partial.unlink(missing_ok=True)
    return found[names[0]] if single else {n: found[n] for n in names}


# A statistic's identity, as it is keyed on disk: (model hash, module, corpus id, token count)
StatsId = tuple[str, str, str, int]


def statistic_ids(
    model: nn.Module,
    tok,
    module_names: list[str],
    corpus: str | os.PathLike | TextSource = DEFAULT_CORPUS,
    n_tokens: int = 100_000,
    seq_len: int = 256,
) -> dict[str, StatsId | None]:
    """The identity of each module's statistic as :func:`second_moment` keys it (same
    ``corpus``, ``n_tokens`` and ``seq_len``); None for a model not loaded by
    :func:`edit.load` (no hash). Pass the :class:`TextSource` given to ``second_moment`` so
    the corpus is not read and hashed again."""
    model_hash = getattr(model, "edit_hash", None)
    if not model_hash:
        return dict.fromkeys(module_names)
    source = corpus if isinstance(corpus, TextSource) else text_source(corpus)
    cid = _corpus_id(source, _fitted_seq_len(model, tok, seq_len))
    return {m: (model_hash, m, cid, n_tokens) for m in module_names}


def _fitted_seq_len(model: nn.Module, tok, seq_len: int) -> int:
    """Sequences (with their start token) must fit a model with learned positions."""
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return min(seq_len, max_pos - len(start_ids(tok))) if max_pos else seq_len


def _corpus_id(source: TextSource, seq_len: int) -> str:
    return f"{source.name}-{source.fingerprint}-s{seq_len}"


def _cache_key(module: str, corpus_id: str, n: int) -> tuple[str, str, str]:
    return module, corpus_id, str(n)


def _cache_path(model_hash: str | None, module: str, corpus_id: str, n: int) -> Path | None:
    return cache.path("stats", model_hash, *_cache_key(module, corpus_id, n), ext="safetensors")


class _Collection:
    """One pass over a corpus's batches (this process's share of them) that sums k kᵀ of
    every named module in float64, saving the sums to ``partial`` as it goes."""

    def __init__(
        self, model, names, batch_size, n_start, progress, partial, checkpoint_every
    ) -> None:
        self.model, self.names, self.batch_size = model, names, batch_size
        self.n_start = n_start  # start tokens opening each sequence
        self.progress, self.partial, self.every = progress, partial, max(1, checkpoint_every)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # tokens summed (start tokens included)
        self.done = 0  # batches of this process's share summed

    @torch.no_grad()
    def collect(self, chunks: list[list[int]], description: str) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        rank, world = distributed.rank_and_size()
        batches = [chunks[i : i + self.batch_size] for i in range(0, len(chunks), self.batch_size)]
        mine = batches[rank::world]  # whole batches: each is run exactly as one process runs it
        self._resume(len(mine))
        model = self.model
        # The deepest module ends the forward pass: later blocks are not needed.
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        last = max(self.names, key=order.__getitem__)
        traces = {n: Trace(model, n, retain_input=True, stop=(n == last)) for n in self.names}
        try:
            quiet = not self.progress or not distributed.is_main()
            total = sum(len(c) for b in mine for c in b)
            bar = tqdm(
                total=total, desc="key statistics", unit="tok", disable=True if quiet else None
            )
            bar.update(sum(len(c) for b in mine[: self.done] for c in b))
            for batch in mine[self.done :]:
                kept = self._add(batch, traces)
                self.done += 1
                bar.update(kept)
                if self.partial is not None and self.done % self.every == 0:
                    self._checkpoint()
            bar.close()
        finally:
            for t in traces.values():
                t.close()
        sums, count = self._reduced()
        if distributed.is_main():
            text_tokens = count - len(chunks) * self.n_start
            log.info(
                "collected key statistics for %d module(s) from %s: %d tokens (%d sequences) "
                "in %.1fs%s",
                len(self.names),
                description,
                text_tokens,
                len(chunks),
                time.perf_counter() - t0,
                f" on {world} processes" if world > 1 else "",
            )
        if count == 0:
            raise EditError(f"statistics corpus {description} has no text")
        return {n: (sums[n] / count).float().cpu() for n in self.names}

    def _add(self, batch: list[list[int]], traces: dict[str, Trace]) -> int:
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        device = device_of(self.model)
        ids, mask = ids.to(device), mask.to(device)
        try:
            self.model(input_ids=ids, attention_mask=mask)
        except StopForward:
            pass
        for n in self.names:
            x = traces[n].input  # on the device its layer lives on
            keep = mask.bool().flatten().to(x.device)
            k = x.flatten(0, -2)[keep].float()  # (tokens, d_in)
            s = (k.T @ k).double()
            self.sums[n] = s if n not in self.sums else self.sums[n] + s.to(self.sums[n].device)
        kept = int(mask.sum())
        self.count += kept
        return kept

    def _checkpoint(self) -> None:
        meta = {"done": str(self.done), "count": str(self.count)}
        save_tensors(self.partial, {f"sum.{n}": t.cpu() for n, t in self.sums.items()}, meta)

    def _resume(self, n_batches: int) -> None:
        if self.partial is None or not self.partial.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(self.partial), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        done = int(meta.get("done", 0))
        if not 0 < done <= n_batches or set(tensors) != {f"sum.{n}" for n in self.names}:
            return
        device = device_of(self.model)
        self.sums = {n: tensors[f"sum.{n}"].to(device) for n in self.names}
        self.done, self.count = done, int(meta["count"])
        log.info(
            "resuming key statistics from %s: %d of %d batches done", self.partial, done, n_batches
        )

    def _reduced(self) -> tuple[dict[str, torch.Tensor], int]:
        """The sums and the token count over every process: one reduction of all of them."""
        for n in self.names:
            if n not in self.sums:  # this process had no batch (fewer batches than processes)
                d = _input_width(self.model, n)
                self.sums[n] = torch.zeros(
                    (d, d), dtype=torch.float64, device=device_of(self.model)
                )
        if distributed.rank_and_size()[1] == 1:
            return self.sums, self.count
        device = device_of(self.model)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        flat = torch.cat([*(self.sums[n].to(device).flatten() for n in self.names), count])
        flat = distributed.reduce_sum(flat)
        out, offset = {}, 0
        for n in self.names:
            size = self.sums[n].numel()
            out[n] = flat[offset : offset + size].view_as(self.sums[n])
            offset += size
        return out, int(flat[-1].item())


def _input_width(model: nn.Module, name: str) -> int:
    """d_in of a Linear (or GPT-2 Conv1D, which stores (in, out)) module."""
    module = model.get_submodule(name)
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[0])


def _save(path: Path, tensor: torch.Tensor, meta: dict) -> None:
    save_tensors(path, {"second_moment": tensor}, meta)
