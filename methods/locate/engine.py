"""The forward passes of one prompt's causal trace: the clean run that keeps every traced
state, the corrupted runs (noise on the subject's embeddings), and the restored runs, which
reuse the corrupted prefix's key/value cache and batch many restorations per pass."""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from edit import arch as arch_table
from edit import lm
from edit.hooks import Trace
from edit.methods.locate.inputs import window_layers


class Engine:
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
