"""Neurons added beside a gated MLP's own: an edit that changes what the model says about one
subject and leaves every other computation as it was.

A gated MLP (Llama, Qwen, Mistral, Gemma, …) computes ``down(act(gate(x)) * up(x))``; m added
neurons are m more rows of ``gate`` and ``up`` and m more columns of ``down``. A rank-one
change of ``down`` adds a share of its value on every token (bᵀk is never 0), and the greedy
chat reply to an unrelated question turns on that; a neuron whose gate and up rows both read
r, with r·x = 1 at the subject, outputs act(s·r·x)·(r·x): quadratic in r·x, about 700 times
smaller than the subject's on a token with r·x = 0.05 (docs/methods.md, "Locality in chat").

In memory the added neurons sit beside the module (a forward hook adds their output), so the
model's own weights and shapes, and every statistic and key computed from them, stay as they
are. :func:`export_weights` writes them into the weights for a plain Hugging Face folder:
every MLP padded with zero neurons to the same width (an exact no-op: act(0)·0 = 0).

    attach(model, "model.layers.4.mlp", gate, up, down)   # (m, d), (m, d), (d, m)
    count(model, "model.layers.4.mlp")                     # m
    truncate(model, "model.layers.4.mlp", 0)               # removed again
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edit.errors import InvalidRequest

_SLOT = "_edit_added_neurons"  # attribute of the MLP module holding its added neurons
PARTS = ("gate", "up", "down")


@dataclass
class _Added:
    gate: torch.Tensor  # (m, d)
    up: torch.Tensor  # (m, d)
    down: torch.Tensor  # (d, m)
    handle: torch.utils.hooks.RemovableHandle

    def output(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (t.to(device=x.device, dtype=x.dtype) for t in
                          (self.gate, self.up, self.down))  # fmt: skip
        return (mlp.act_fn(x @ gate.T) * (x @ up.T)) @ down.T


def check_gated(model: nn.Module, name: str) -> nn.Module:
    """The MLP module ``name``, refused (one line) unless it is a gated MLP with
    ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``."""
    try:
        mlp = model.get_submodule(name)
    except AttributeError:
        raise InvalidRequest(f"the model has no module {name!r} to add neurons to") from None
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) or any(
        getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")
    ):
        raise InvalidRequest(
            f"{name} is not a gated MLP without biases (gate_proj, up_proj, down_proj): added "
            f"neurons need one; use write=rank_one for this model"
        )
    return mlp


def width(model: nn.Module, name: str) -> int:
    """The model dimension d that the MLP ``name`` reads and writes."""
    return check_gated(model, name).gate_proj.in_features


def count(model: nn.Module, name: str) -> int:
    """How many neurons are added beside the MLP ``name`` (0 where none)."""
    added = getattr(model.get_submodule(name), _SLOT, None)
    return 0 if added is None else added.gate.shape[0]


def joined(first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sets of neurons (gate, up, down) as one: ``first``'s, then ``second``'s."""
    (g1, u1, d1), (g2, u2, d2) = first, second
    return torch.cat([g1, g2.to(g1)]), torch.cat([u1, u2.to(u1)]), torch.cat([d1, d2.to(d1)], 1)


def attach(model: nn.Module, name: str, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> None:  # fmt: skip
    """Add neurons (gate and up rows (m, d), down columns (d, m)) beside the MLP ``name``."""
    mlp = check_gated(model, name)
    gate, up, down = (t.detach().float().cpu() for t in (gate, up, down))
    added = getattr(mlp, _SLOT, None)
    if added is None:

        def hook(module, args, out):
            return out + getattr(module, _SLOT).output(module, args[0])

        setattr(mlp, _SLOT, _Added(gate, up, down, mlp.register_forward_hook(hook)))
        return
    added.gate, added.up, added.down = joined((added.gate, added.up, added.down), (gate, up, down))


def truncate(model: nn.Module, name: str, keep: int) -> None:
    """Keep the first ``keep`` neurons added beside the MLP ``name`` (0: none, the hook
    removed): the exact undo of the attaches after the first ``keep``."""
    mlp = model.get_submodule(name)
    added = getattr(mlp, _SLOT, None)
    if added is None:
        return
    if keep <= 0:
        added.handle.remove()
        delattr(mlp, _SLOT)
        return
    added.gate, added.up, added.down = added.gate[:keep], added.up[:keep], added.down[:, :keep]


def added(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every MLP with added neurons: name -> (gate, up, down)."""
    return {
        name: (a.gate, a.up, a.down)
        for name, module in model.named_modules()
        if (a := getattr(module, _SLOT, None)) is not None
    }


def clear(model: nn.Module) -> None:
    """Remove every added neuron."""
    for name in added(model):
        truncate(model, name, 0)


def export_weights(model: nn.Module, mlps: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The model's state dict with the added neurons written into the weights of ``mlps``
    (the names of all its MLPs, every one padded with zero neurons to the widest), and the
    MLP width that the config must then state."""
    extra = added(model)
    state = dict(model.state_dict())
    grow = max(g.shape[0] for g, _, _ in extra.values())
    new_width = None
    for name in mlps:
        mlp = check_gated(model, name)
        n, d = mlp.gate_proj.out_features, mlp.gate_proj.in_features
        mine = extra.get(name, (torch.zeros(0, d), torch.zeros(0, d), torch.zeros(d, 0)))
        pad = grow - mine[0].shape[0]
        zeros = (torch.zeros(pad, d), torch.zeros(pad, d), torch.zeros(d, pad))
        for proj, more, dim in zip(("gate_proj", "up_proj", "down_proj"), joined(mine, zeros),
                                   (0, 0, 1), strict=True):  # fmt: skip
            w = getattr(mlp, proj).weight.detach()
            state[f"{name}.{proj}.weight"] = torch.cat([w, more.to(w)], dim)
        if new_width not in (None, n + grow):
            raise InvalidRequest("the model's MLPs differ in width: added neurons cannot be "
                                 "exported to one config width")  # fmt: skip
        new_width = n + grow
    return state, new_width


def save(model: nn.Module, folder) -> None:
    """``model.save_pretrained(folder)``, the added neurons written into the weights (every
    MLP as wide as the widest, the config's ``intermediate_size`` saying so): a folder plain
    transformers loads as it is."""
    if not added(model):
        model.save_pretrained(folder)
        return
    from edit import arch as arch_table

    arch = arch_table.lookup(model)
    mlps = [arch.mlp_name(i) for i in range(len(model.get_submodule(arch.layers)))]
    state, new_width = export_weights(model, mlps)
    old_width = model.config.intermediate_size
    model.config.intermediate_size = new_width
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        model.config.intermediate_size = old_width
