"""Low-rank weight updates: what every locate-then-edit method returns.

An :class:`Update` maps module names to factors (A, B) with ΔW = A @ B in (out, in) layout,
A: (out, r), B: (r, in); ROME has r = 1, a batch of n facts r = n per layer. ``keys`` holds,
per module, the keys (n, in) of the facts the update wrote: AlphaEdit keeps later edits
from overwriting them. Methods compute an Update without touching the model;
:meth:`Update.apply` adds it and returns a handle whose :meth:`Applied.undo` restores
the exact previous weights (they are copied before the first write).

``neurons`` holds, per gated MLP, neurons added beside its own (gate and up rows (m, d), down
columns (d, m); :mod:`edit.neurons`): ROME's ``write: neuron``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edit import arch as arch_table
from edit import neurons as added_neurons
from edit.errors import EditError
from edit.placement import add_to_weight, read_weight, write_weight


@dataclass
class Applied:
    """Handle for an applied update: keeps the overwritten weights for an exact undo."""

    model: nn.Module
    originals: dict[str, torch.Tensor]
    undone: bool = False
    neurons_before: dict[str, int] = field(default_factory=dict)  # MLP -> neurons added before

    @torch.no_grad()
    def undo(self) -> None:
        if self.undone:
            return
        for name, w in self.originals.items():
            write_weight(self.model, name, w)
        for name, n in self.neurons_before.items():
            added_neurons.truncate(self.model, name, n)
        self.undone = True


@dataclass
class Update:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (n, in)
    # MLP -> (gate rows (m, d), up rows (m, d), down columns (d, m)) added beside its own
    neurons: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    def is_finite(self) -> bool:
        tensors = [t for ab in self.factors.values() for t in ab]
        tensors += [t for parts in self.neurons.values() for t in parts]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def misfit(self, model: nn.Module) -> str | None:
        """Why this update cannot be added to ``model`` (a module it lacks, factors whose
        shapes do not match the weight, non-finite values), or None when it fits."""
        transposed = arch_table.lookup(model).transposed
        for name, (a, b) in self.factors.items():
            try:
                weight = arch_table.weight_of(model, name)
            except AttributeError:
                return f"it changes {name!r}, which this model does not have"
            out, inp = arch_table.as_out_in(weight, transposed).shape
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != out or b.shape[1] != inp \
                    or a.shape[1] != b.shape[0]:  # fmt: skip
                return (
                    f"the factors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                    f"which do not make its ({out}, {inp}) weight"
                )
        for name, k in self.keys.items():
            inp = self.factors[name][1].shape[1] if name in self.factors else None
            if k.dim() != 2 or k.shape[1] != inp:
                return f"the keys of {name} have shape {tuple(k.shape)}, not (n, {inp})"
        for name, (gate, up, down) in self.neurons.items():
            try:
                d = added_neurons.width(model, name)
            except EditError as err:
                return str(err)
            m = gate.shape[0] if gate.dim() == 2 else -1
            if gate.shape != (m, d) or up.shape != (m, d) or down.shape != (d, m):
                return (
                    f"the neurons added to {name} have shapes {tuple(gate.shape)}, "
                    f"{tuple(up.shape)} and {tuple(down.shape)}, not (m, {d}), (m, {d}), ({d}, m)"
                )
        if not self.is_finite():
            return "its tensors hold non-finite values (inf or NaN)"
        return None

    def delta(self, name: str, transposed: bool = False) -> torch.Tensor:
        a, b = self.factors[name]
        d = a.float() @ b.float()  # (out, in)
        return d.T if transposed else d

    @torch.no_grad()
    def apply(self, model: nn.Module) -> Applied:
        transposed = arch_table.lookup(model).transposed
        originals = {}
        for name in self.factors:  # each weight where its layer lives (device map, offload)
            originals[name] = read_weight(model, name).detach().clone()
            add_to_weight(model, name, self.delta(name, transposed))
        before = {}
        for name, (gate, up, down) in self.neurons.items():
            before[name] = added_neurons.count(model, name)
            added_neurons.attach(model, name, gate, up, down)
        return Applied(model, originals, neurons_before=before)

    def merged(self, other: Update) -> Update:
        """One update that does what ``self`` then ``other`` do: per module the factors side
        by side, A = [A₁ A₂], B = [B₁; B₂] (so ΔW = A₁B₁ + A₂B₂), and the keys of both."""
        factors = dict(self.factors)
        for name, (a, b) in other.factors.items():
            if name in factors:
                a0, b0 = factors[name]
                factors[name] = (torch.cat([a0, a.to(a0)], 1), torch.cat([b0, b.to(b0)], 0))
            else:
                factors[name] = (a, b)
        neurons = dict(self.neurons)
        for name, parts in other.neurons.items():
            neurons[name] = added_neurons.joined(neurons[name], parts) if name in neurons else parts
        return Update(factors, with_keys(self.keys, other), neurons)

    def select(self, keep: dict[str, torch.Tensor]) -> Update:
        """This update with only the parts ``keep`` selects: per module a bool mask over its
        factors' rank (A's columns, B's rows and the keys' rows, one per fact as MEMIT,
        AlphaEdit and ROME write them) or over the MLP's added neurons; a module left with
        none is dropped."""
        factors, keys, neurons = {}, {}, {}
        for name, (a, b) in self.factors.items():
            k = keep[name].to(a.device)
            if bool(k.any()):
                factors[name] = (a[:, k].contiguous(), b[k.to(b.device)])
                if name in self.keys:
                    keys[name] = self.keys[name][k.to(self.keys[name].device)]
        for name, (gate, up, down) in self.neurons.items():
            k = keep[name].to(gate.device)
            if bool(k.any()):
                neurons[name] = (gate[k], up[k], down[:, k].contiguous())
        return Update(factors, keys, neurons)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor dict for safetensors: ``<module>.A``, ``<module>.B`` and,
        where recorded, ``<module>.keys``; ``<mlp>.neurons.gate`` (``.up``, ``.down``)."""
        out = {}
        for name, (a, b) in self.factors.items():
            out[f"{name}.A"] = a.detach().float().cpu().contiguous()
            out[f"{name}.B"] = b.detach().float().cpu().contiguous()
        for name, k in self.keys.items():
            out[f"{name}.keys"] = k.detach().float().cpu().contiguous()
        for name, parts in self.neurons.items():
            for part, t in zip(added_neurons.PARTS, parts, strict=True):
                out[f"{name}.neurons.{part}"] = t.detach().float().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Update:
        added = sorted({k.rsplit(".", 2)[0] for k in tensors if ".neurons." in k})
        neurons = {}
        for name in added:
            keys = [f"{name}.neurons.{part}" for part in added_neurons.PARTS]
            if any(k not in tensors for k in keys):
                raise ValueError(f"added neurons incomplete for {name}")
            neurons[name] = tuple(tensors[k] for k in keys)
        tensors = {k: v for k, v in tensors.items() if ".neurons." not in k}
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        missing = [n for n in names if f"{n}.A" not in tensors or f"{n}.B" not in tensors]
        if missing:
            raise ValueError(f"factors incomplete for {missing}")
        return cls(
            {n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in names},
            {n: tensors[f"{n}.keys"] for n in names if f"{n}.keys" in tensors},
            neurons,
        )


def with_keys(history: dict[str, torch.Tensor] | None, update: Update) -> dict[str, torch.Tensor]:
    """``history`` (module -> keys (m, in) of earlier edits) with the keys ``update`` wrote
    appended; ``history`` itself is not changed."""
    out = dict(history or {})
    for name, k in update.keys.items():
        out[name] = torch.cat([out[name], k.to(out[name])]) if name in out else k
    return out
