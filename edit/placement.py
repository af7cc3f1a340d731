"""Reading and writing weights wherever a device map put them.

    w = read_weight(model, "model.layers.30.mlp.down_proj")       # its values, a real tensor
    add_to_weight(model, "model.layers.30.mlp.down_proj", delta)   # W += ΔW, where W lives
    write_weight(model, "model.layers.30.mlp.down_proj", w)        # W = w (an exact undo)

A model loaded with ``device_map="auto"`` (accelerate's big-model inference) has each layer
on its own GPU, and the layers that fit nowhere offloaded to CPU memory or to disk: their
parameters are placeholders on the ``meta`` device, and an accelerate hook
(``AlignDevicesHook``) loads the real values from its weights map before every forward pass.
Hooks and forward passes need nothing special (every tensor a hook sees is on its layer's
device); a weight update does: here it goes into the weights map, as an override held in
CPU memory (a disk-offloaded weight is read from the checkpoint itself, which is never
written).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import nn

from edit.errors import EditError


def _offload_slot(module: nn.Module, attr: str) -> tuple[MutableMapping, str] | None:
    """(the mapping that holds an offloaded tensor's value, its key), or None when the
    module's tensors are where they seem (on a device, not placeholders)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, has_offloaded_params

    if not has_offloaded_params(module):
        return None
    store, key = module._hf_hook.weights_map, attr
    while isinstance(store, PrefixedDataset):
        store, key = store.dataset, f"{store.prefix}{key}"
    if isinstance(store, OffloadedWeightsLoader):
        return store.state_dict, key  # looked up before the files (accelerate's rule)
    if isinstance(store, MutableMapping):
        return store, key
    raise EditError(
        f"cannot update an offloaded weight held in a {type(store).__name__}: load the model "
        f"with a device map that keeps the edited layers on a device or in CPU memory"
    )


def _read(module: nn.Module, attr: str) -> torch.Tensor:
    if _offload_slot(module, attr) is None:
        return getattr(module, attr)
    # the weights map loads it (from the override, CPU memory or the checkpoint file)
    return module._hf_hook.weights_map[attr]


def read_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """The values of a module's weight: the parameter itself, or for an offloaded module a
    tensor read from its weights map (copy it before changing it)."""
    return _read(model.get_submodule(module_name), "weight")


@torch.no_grad()
def write_weight(model: nn.Module, module_name: str, value: torch.Tensor) -> None:
    """Set a module's weight to ``value`` (same shape), on whatever holds it."""
    module = model.get_submodule(module_name)
    slot = _offload_slot(module, "weight")
    if slot is None:
        module.weight.copy_(value)
        return
    store, key = slot
    old = module._hf_hook.weights_map["weight"]
    store[key] = value.detach().to(device="cpu", dtype=old.dtype).clone()


@torch.no_grad()
def add_to_weight(model: nn.Module, module_name: str, delta: torch.Tensor) -> None:
    """W += ``delta`` (the weight's storage layout), in the weight's dtype, where W lives."""
    module = model.get_submodule(module_name)
    if _offload_slot(module, "weight") is None:
        w = module.weight
        w.add_(delta.to(device=w.device, dtype=w.dtype))
        return
    w = read_weight(model, module_name).clone()
    w.add_(delta.to(device=w.device, dtype=w.dtype))
    write_weight(model, module_name, w)


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, values) of every state-dict tensor, in name order; offloaded ones are read one
    at a time from their weights maps (never the whole model at once)."""
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type == "meta":
            module_name, _, attr = name.rpartition(".")
            tensor = _read(model.get_submodule(module_name), attr)
        yield name, tensor
